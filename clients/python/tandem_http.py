"""A minimal client of Tandem's HTTP/JSON API using only `requests`.

Any node answers (a follower forwards to the leader). Calls are idempotent
per gid, so a call that failed in transit (a connection error, a 503) is
retried — on the next node — until `deadline` seconds have passed.
Errors are RFC 9457 problem documents; `TandemError` carries one.
"""

import time

import requests


class TandemError(Exception):
    def __init__(self, status, problem):
        self.status = status
        self.problem = problem
        super().__init__(f"{status} {problem.get('type')}: {problem.get('detail')}")


class Tandem:
    def __init__(self, nodes, deadline=20.0, timeout=30.0):
        """`nodes`: base URLs such as "http://127.0.0.1:7080"."""
        self.nodes = list(nodes)
        self.deadline = deadline
        self.timeout = timeout
        self.session = requests.Session()

    def _call(self, method, path, body=None, params=None):
        started = time.monotonic()
        attempt = 0
        while True:
            node = self.nodes[attempt % len(self.nodes)]
            attempt += 1
            try:
                r = self.session.request(
                    method, node + path, json=body, params=params, timeout=self.timeout
                )
            except requests.ConnectionError:
                r = None
            if r is not None and r.status_code < 300:
                return r.json()
            if r is not None and r.status_code not in (429, 503):
                raise TandemError(r.status_code, r.json())
            if time.monotonic() - started > self.deadline:
                if r is None:
                    raise TandemError(503, {"detail": "no node answered"})
                raise TandemError(r.status_code, r.json())
            time.sleep(min(0.05 * attempt, 1.0))

    # Transactions -------------------------------------------------------
    def begin(self, gid, protocol, **options):
        body = {"gid": gid, "protocol": protocol}
        if options:
            body["options"] = options
        return self._call("POST", "/v1/transactions", body)["transaction"]

    def register(self, gid, branch_id, ops, payload=None):
        body = {"branch_id": branch_id, "ops": [{"op": o, "endpoint": e} for o, e in ops.items()]}
        if payload is not None:
            body["payload"] = payload
        return self._call("POST", f"/v1/transactions/{gid}/branches", body)["transaction"]

    def commit(self, gid, wait=True, wait_timeout_ms=20000):
        body = {"wait": wait, "wait_timeout_ms": wait_timeout_ms}
        return self._call("POST", f"/v1/transactions/{gid}/commit", body)["transaction"]

    def abort(self, gid, reason="", wait=True):
        body = {"reason": reason, "wait": wait}
        return self._call("POST", f"/v1/transactions/{gid}/abort", body)["transaction"]

    def submit_saga(self, gid, steps, wait=True, **options):
        body = {"gid": gid, "steps": steps, "wait": wait, "wait_timeout_ms": 20000}
        if options:
            body["options"] = options
        return self._call("POST", "/v1/sagas", body)["transaction"]

    def get(self, gid):
        return self._call("GET", f"/v1/transactions/{gid}")["transaction"]

    def list(self, **filters):
        return self._call("GET", "/v1/transactions", params=filters)


def call_participant(endpoint, gid, branch_id, op, protocol, payload=None):
    """What an application does itself in TCC (Try) and XA: call its
    participant with the headers of the participant contract
    (docs/http-participants.md). Returns the HTTP status."""
    headers = {
        "tandem-gid": gid,
        "tandem-branch-id": branch_id,
        "tandem-op": op,
        "tandem-protocol": protocol,
        "tandem-fence-term": "0",
        "tandem-fence-index": "0",
    }
    r = requests.post(endpoint, json=payload if payload is not None else {}, headers=headers, timeout=10)
    return r.status_code
