"""Back ends. Server drivers are imported only when their adapter is used."""
