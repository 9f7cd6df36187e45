#!/usr/bin/env python3
"""Drives the IronMQ v3 test server with the official Python client (PyPI `iron-mq`, 0.9)
and checks the answers the Rust adapter relies on. Exits 1 on the first mismatch.

    .venv-test/bin/python check_client.py [--url http://127.0.0.1:8787] [--token TOKEN]

The defaults come from QCLUSTER_TEST_IRONMQ_URL and QCLUSTER_TEST_IRONMQ_TOKEN. Queues made here are
named `check-<random>-...` and deleted at the end.
"""

import argparse
import os
import secrets
import sys
import time
from urllib.parse import urlsplit

import requests
from iron_mq import IronMQ

FAILED = []


def check(cond, what):
    print(("ok      " if cond else "FAILED  ") + what)
    if not cond:
        FAILED.append(what)


def status_of(fn):
    """The HTTP status an iron_mq call raised, or None if it succeeded."""
    try:
        fn()
    except requests.HTTPError as e:
        return e.response.status_code
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default=os.environ.get("QCLUSTER_TEST_IRONMQ_URL", "http://127.0.0.1:8787"))
    ap.add_argument("--token", default=os.environ.get("QCLUSTER_TEST_IRONMQ_TOKEN", "qcluster-test-token"))
    args = ap.parse_args()
    u = urlsplit(args.url)
    mk = lambda token: IronMQ(host=u.hostname, port=u.port or 80, protocol=u.scheme,
                              project_id="check-project", token=token)
    mq = mk(args.token)
    run = secrets.token_hex(4)
    made = []

    def queue(suffix):
        name = f"check-{run}-{suffix}"
        made.append(name)
        return mq.queue(name)

    try:
        # Post (bulk) and info.
        q = queue("basic")
        ids = q.post("one", {"body": "two"}, {"body": "three", "delay": 0})["ids"]
        check(len(ids) == 3 and len(set(ids)) == 3, "post of 3 returns 3 distinct ids in order")
        info = q.info()
        check(info["size"] == 3 and info["total_messages"] == 3, f"info size/total 3/3: {info}")

        # Reserve with a timeout: n honoured, in order, reservation ids, reserved_count 1.
        got = q.reserve(max=2, timeout=2)["messages"]
        check([m["body"] for m in got] == ["one", "two"], "reserve n=2 gives the first two in order")
        check(all(m.get("reservation_id") and m["reserved_count"] == 1 for m in got),
              "reserved messages carry a reservation_id and reserved_count 1")
        check(q.info()["size"] == 1, "reserved messages are not counted in size")

        # Delete with the reservation id; then the same again is a 404.
        check(status_of(lambda: q.delete(got[0]["id"], got[0]["reservation_id"])) is None,
              "delete with the reservation id")
        check(status_of(lambda: q.delete(got[0]["id"], got[0]["reservation_id"])) == 404,
              "deleting it again answers 404")

        # Expiry and redelivery with a new reservation id.
        time.sleep(2.3)
        again = q.reserve(max=1, timeout=30)["messages"]
        check(len(again) == 1 and again[0]["id"] == got[1]["id"],
              "a timed-out reservation comes back first")
        check(again[0]["reservation_id"] != got[1]["reservation_id"]
              and again[0]["reserved_count"] == 2,
              "redelivery has a new reservation id and reserved_count 2")

        # Stale reservation: delete 403, release and touch 404, nothing changes.
        stale = got[1]["reservation_id"]
        mid = got[1]["id"]
        check(status_of(lambda: q.delete(mid, stale)) == 403,
              "delete with a stale reservation id answers 403")
        check(status_of(lambda: q.release(mid, stale)) == 404,
              "release with a stale reservation id answers 404")
        check(status_of(lambda: q.touch(mid, stale, timeout=60)) == 404,
              "touch with a stale reservation id answers 404")
        check(status_of(lambda: q.delete(mid)) == 403,
              "delete of a reserved message without its reservation id answers 403")

        # Touch: a new reservation id; the old one is stale afterwards.
        touched = q.touch(mid, again[0]["reservation_id"], timeout=30)
        new_rid = touched.get("reservation_id")
        check(bool(new_rid) and new_rid != again[0]["reservation_id"],
              "touch returns a new reservation id")
        check(status_of(lambda: q.delete(mid, again[0]["reservation_id"])) == 403,
              "after touch the former reservation id is stale")

        # Release (with a delay) makes it come back, first in line, after the delay.
        check(status_of(lambda: q.release(mid, new_rid, delay=1)) is None, "release with delay")
        check(q.reserve(max=1, timeout=30)["messages"][0]["body"] == "three",
              "a released, delayed message waits; the next one comes")
        time.sleep(1.2)
        back = q.reserve(max=5, timeout=30)["messages"]
        check([m["id"] for m in back] == [mid] and back[0]["reserved_count"] == 3,
              "the released message comes back after its delay, reserved_count 3")
        dels = q.delete_multiple(messages={"messages": back})
        check(dels.get("msg") == "Deleted", "batch delete with reservation ids")

        # Long polling: a reserve with wait returns when a message is posted.
        t0 = time.time()
        empty = q.reserve(max=1, timeout=30, wait=1)["messages"]
        check(empty == [] and 0.9 <= time.time() - t0 < 3, "reserve with wait=1 on empty waits 1 s")

        # Peek does not reserve; get by id; clear.
        q.post("peeked")
        check([m["body"] for m in q.peek(max=5)["messages"]][-1:] == ["peeked"], "peek")
        check(q.reserve(max=5, timeout=30)["messages"][-1]["body"] == "peeked",
              "a peeked message can still be reserved")
        q.post("x", "y")
        check(q.clear().get("msg") == "Cleared" and q.size() == 0, "clear")

        # Errors: an unknown queue is 404; a bad token 401; an oversize body refused.
        check(status_of(lambda: mq.queue(f"check-{run}-none").info()) == 404,
              "info of a missing queue answers 404")
        check(status_of(lambda: mk("wrong-token").queue(f"check-{run}-basic").info()) == 401,
              "a wrong token answers 401")
        status = status_of(lambda: q.post("z" * (64 * 1024 + 1)))
        check(status in (400, 413), f"a body over 64 KiB is refused (status {status})")
        check(q.size() == 0, "the refused body was not stored")
    finally:
        for name in made:
            try:
                mq.queue(name).delete_queue()
            except requests.HTTPError:
                pass

    if FAILED:
        print(f"{len(FAILED)} check(s) failed", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
