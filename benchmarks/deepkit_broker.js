// Deepkit's own broker, the system brokerlock was ported from, as a benchmark peer.
//
//   node deepkit_broker.js server PORT
//       BrokerKernel behind RpcTcpServer on 127.0.0.1:PORT; prints "listening".
//   node deepkit_broker.js client PORT NAME TTL TIMEOUT
//       One BrokerDeepkitAdapter client of the lock NAME, driven over stdin by the
//       Python participant: "a" acquires, "r" releases, "p" pings, "q" quits; each
//       line is answered "ok" or "err <message>".
//
// Plain CommonJS; the packages come from NODE_PATH (a cache folder outside the
// repository, filled by benchmarks/servers.py with npm).
//
// TTL and TIMEOUT are given as the client's API documents them (a duration string
// or milliseconds). Deepkit 1.0.19 sends milliseconds but its server reads seconds:
// '120s' lasts 33 hours, and a ttl over ~36 minutes overflows Node's 32-bit timer,
// which then fires at once and lets a second holder in. The benchmark uses 120 s,
// like every other kind, which is safe from the overflow.
'use strict';

const readline = require('readline');
const { BrokerKernel, BrokerDeepkitAdapter, BrokerLock } = require('@deepkit/broker');
const { RpcTcpServer, RpcTcpClientAdapter } = require('@deepkit/rpc-tcp');

async function server(port) {
  const kernel = new BrokerKernel();
  const tcp = new RpcTcpServer(kernel, `127.0.0.1:${port}`);
  await tcp.start();
  process.stdout.write('listening\n');
  process.on('SIGINT', () => process.exit(0));
  process.on('SIGTERM', () => process.exit(0));
}

async function client(port, name, ttl, timeout) {
  const adapter = new BrokerDeepkitAdapter({
    servers: [{ url: '', transport: new RpcTcpClientAdapter(`127.0.0.1:${port}`) }],
  });
  const item = new BrokerLock(adapter).item(name, { ttl, timeout });
  const lines = readline.createInterface({ input: process.stdin, terminal: false });
  process.stdout.write('ready\n');
  for await (const line of lines) {
    try {
      if (line === 'a') await item.acquire();
      else if (line === 'r') await item.release();
      else if (line === 'q') break;
      else if (line !== 'p') throw new Error(`unknown command ${JSON.stringify(line)}`);
      process.stdout.write('ok\n');
    } catch (error) {
      process.stdout.write(`err ${String(error && error.message ? error.message : error).replace(/\n/g, ' ')}\n`);
    }
  }
  await adapter.disconnect();
  process.exit(0);
}

const [mode, port, ...rest] = process.argv.slice(2);
const main = mode === 'server' ? server(port) : client(port, rest[0], rest[1], rest[2]);
main.catch((error) => {
  process.stderr.write(`${error && error.stack ? error.stack : error}\n`);
  process.exit(1);
});
