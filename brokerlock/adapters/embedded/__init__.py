"""What the two embedded stores (SQLite and lock files) share: private files and
directories, the witness that proves a holder alive, the bells that wake waiters, and
the store base class that reads a grant's news. Nothing here knows SQL or a record
format; nothing here imports a back end."""
