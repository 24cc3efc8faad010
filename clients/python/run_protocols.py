"""Runs a saga, a TCC and a 2PC transaction against a Tandem cluster over
its HTTP/JSON API with plain `requests`, and prints one JSON line with
their final states. Used by coordinator/tests/python_clients.rs:

  python3 clients/python/run_protocols.py --nodes URL[,URL…] \
      --saga BASE --tcc BASE --twopc BASE --prefix GIDPREFIX
"""

import argparse
import json
import sys

from tandem_http import Tandem, call_participant


def endpoint(base, op):
    return f"{base.rstrip('/')}/tandem/{op}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", required=True)
    ap.add_argument("--saga", required=True)
    ap.add_argument("--tcc", required=True)
    ap.add_argument("--twopc", required=True)
    ap.add_argument("--prefix", default="py")
    args = ap.parse_args()
    t = Tandem(args.nodes.split(","))
    out = {}

    # Saga: submitted whole, answered once it ended.
    gid = f"{args.prefix}-saga"
    steps = [
        {"branch_id": s, "action": endpoint(args.saga, "action"),
         "compensate": endpoint(args.saga, "compensate"), "payload": {"step": s}}
        for s in ("reserve", "charge")
    ]
    out["saga"] = t.submit_saga(gid, steps)["state"]

    # TCC: begin, enlist, Try (the application's own call), commit.
    gid = f"{args.prefix}-tcc"
    t.begin(gid, "tcc", timeout_ms=30000)
    ops = {op: endpoint(args.tcc, op) for op in ("try", "confirm", "cancel")}
    t.register(gid, "stock", ops, payload={"sku": 7})
    status = call_participant(ops["try"], gid, "stock", "try", "tcc", {"sku": 7})
    if status != 200:
        print(f"try answered {status}", file=sys.stderr)
        return 1
    out["tcc"] = t.commit(gid)["state"]

    # 2PC: begin, enlist two branches, commit; the coordinator prepares both.
    gid = f"{args.prefix}-2pc"
    t.begin(gid, "2pc", timeout_ms=30000)
    for branch in ("left", "right"):
        ops = {op: endpoint(args.twopc, op) for op in ("prepare", "commit", "rollback")}
        t.register(gid, branch, ops)
    out["2pc"] = t.commit(gid)["state"]

    # A repeat is recognised, and a read agrees.
    assert t.get(f"{args.prefix}-2pc")["state"] == out["2pc"]
    listed = t.list(protocol="saga", state="committed")
    out["listed_sagas"] = [x["gid"] for x in listed["transactions"]]
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
