#!/usr/bin/env python3
"""Publish files from inside a c3 job without the c3-agent binary (stdlib only).

    python3 publish.py artifacts/ckpt.pt [more paths]   # store now; exit 0 once durable
    python3 publish.py --wait-all                       # barrier: everything pending is stored
"""
import json, os, socket, sys


def request(req):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(os.environ["C3_AGENT_SOCKET"])
        s.sendall(json.dumps(req).encode() + b"\n")
        reply = s.makefile("rb").readline()
    return json.loads(reply)


def publish(paths):
    return request({"op": "publish", "paths": [os.path.abspath(p) for p in paths]})


if __name__ == "__main__":
    args = sys.argv[1:]
    wait = "--wait-all" in args
    paths = [a for a in args if a != "--wait-all"]
    for reply in ([publish(paths)] if paths else []) + ([request({"op": "wait_all"})] if wait else []):
        if not reply["ok"]:
            sys.exit("publish: " + reply["error"])
        for f in reply.get("files", []):
            print("published", f["path"], f["size"], f["sha256"])
