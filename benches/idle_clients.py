#!/usr/bin/env python3
"""Opens COUNT client connections to pgrouter, logs each in (SCRAM-SHA-256), holds them all
idle, and prints the proxy's resident memory (VmRSS from /proc) before and after.

    benches/idle_clients.py --port 6432 --pid <pgrouter pid> [--count 10000]

Standard library only; the SCRAM client follows RFC 5802 / RFC 7677. The salted password is
computed once per salt, so a run spends its time on the connections, not on PBKDF2.
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import os
import struct
import sys
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def message(tag, body):
    return tag + struct.pack("!I", len(body) + 4) + body


async def read_message(reader):
    tag = await reader.readexactly(1)
    (length,) = struct.unpack("!I", await reader.readexactly(4))
    return tag, await reader.readexactly(length - 4)


SALTED = {}


def salted_password(password, salt, iterations):
    key = (salt, iterations)
    if key not in SALTED:
        SALTED[key] = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return SALTED[key]


async def login(host, port, user, password, database):
    reader, writer = await asyncio.open_connection(host, port)
    params = b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
    body = struct.pack("!I", 196608) + params
    writer.write(struct.pack("!I", len(body) + 4) + body)
    nonce = base64.b64encode(os.urandom(18)).decode()
    first_bare = f"n=,r={nonce}"
    server_first = None
    while True:
        tag, body = await read_message(reader)
        if tag == b"E":
            raise RuntimeError(body.decode(errors="replace"))
        if tag == b"Z":
            return reader, writer
        if tag != b"R":
            continue
        (code,) = struct.unpack("!I", body[:4])
        if code == 10:  # SASL: mechanisms offered
            data = ("n,," + first_bare).encode()
            out = b"SCRAM-SHA-256\0" + struct.pack("!i", len(data)) + data
            writer.write(message(b"p", out))
        elif code == 11:  # SASLContinue: server-first-message
            server_first = body[4:].decode()
            attrs = dict(part.split("=", 1) for part in server_first.split(","))
            salt, iterations = base64.b64decode(attrs["s"]), int(attrs["i"])
            salted = salted_password(password, salt, iterations)
            client_key = hmac.digest(salted, b"Client Key", "sha256")
            stored_key = hashlib.sha256(client_key).digest()
            without_proof = f"c=biws,r={attrs['r']}"
            auth_message = ",".join([first_bare, server_first, without_proof]).encode()
            signature = hmac.digest(stored_key, auth_message, "sha256")
            proof = bytes(a ^ b for a, b in zip(client_key, signature))
            final = f"{without_proof},p={base64.b64encode(proof).decode()}"
            writer.write(message(b"p", final.encode()))
        elif code in (0, 12):  # AuthenticationOk, SASLFinal
            pass
        else:
            raise RuntimeError(f"unsupported authentication request {code}")


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True, help="pgrouter's process id")
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--user", default="app")
    ap.add_argument("--password", default="app-secret")
    ap.add_argument("--database", default="app")
    ap.add_argument("--hold", type=float, default=3.0, help="seconds to hold them all")
    args = ap.parse_args()

    before = rss_kib(args.pid)
    started = time.monotonic()
    conns = []
    # in batches no larger than a listen backlog (PgBouncer's is 128)
    batch = 100
    for i in range(0, args.count, batch):
        n = min(batch, args.count - i)
        results = await asyncio.gather(
            *(
                asyncio.wait_for(login(args.host, args.port, args.user, args.password, args.database), 60)
                for _ in range(n)
            ),
            return_exceptions=True,
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        conns += [r for r in results if not isinstance(r, BaseException)]
        if failed:
            print(f"{len(failed)} logins failed, the first: {failed[0]!r}; stopping", file=sys.stderr)
            break
    took = time.monotonic() - started
    await asyncio.sleep(args.hold)
    after = rss_kib(args.pid)
    # each connection must still be alive: a Sync is answered with ReadyForQuery
    for reader, writer in conns:
        writer.write(message(b"S", b""))
    alive = 0
    for reader, writer in conns:
        try:
            tag, _ = await asyncio.wait_for(read_message(reader), 30)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            continue
        alive += tag == b"Z"
    for _, writer in conns:
        writer.close()
    per = (after - before) / max(len(conns), 1)
    print(
        f"idle clients: {alive} of {args.count} alive (logged in in {took:.1f} s); RSS "
        f"{before / 1024:.1f} MiB before, {after / 1024:.1f} MiB with them ({per:.2f} KiB per client)"
    )
    return 0 if alive == args.count else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
