#!/usr/bin/env python3
"""A small IronMQ v3 server for tests: pull queues, reservations, touch, release, delay.

Standard library only. State lives in memory and is lost when the process ends.

    python3 ironmq_v3.py --host 127.0.0.1 --port 8787 --token TOKEN

Any project id is accepted; every request needs `Authorization: OAuth TOKEN` (or `?oauth=TOKEN`).

Implemented (paths under /3/projects/{project}/):
  GET    queues                                 list queue names
  GET    queues/{q}                             info: size, total_messages, message_timeout, ...
  PUT    queues/{q}                             create (or update) a pull queue
  PATCH  queues/{q}                             update message_timeout / message_expiration
  DELETE queues/{q}                             delete the queue and every message in it
  POST   queues/{q}/messages                    post up to 100 messages {"messages":[{body,delay}]}
  GET    queues/{q}/messages?n=N                peek (not reserved, not delayed), N <= 100
  GET    queues/{q}/messages/{id}               one message by id
  DELETE queues/{q}/messages/{id}               delete (reservation_id needed while reserved)
  DELETE queues/{q}/messages                    {"ids":[...]} batch delete, or {} to clear
  POST   queues/{q}/clear                       clear (the v2 path, kept for old clients)
  POST   queues/{q}/reservations                reserve {n, timeout, wait, delete}
  POST   queues/{q}/messages/{id}/release       {reservation_id, delay}
  POST   queues/{q}/messages/{id}/touch         {reservation_id, timeout} -> new reservation_id

Semantics as IronMQ documents them: a reserved message is invisible until its reservation
times out, then it can be reserved again with a new reservation id and reserved_count + 1;
timed-out and released messages go to the front of the queue; delete with a stale or wrong
reservation id answers 403 {"msg": "Reservation has timed out"}; touch and release with one
answer 404; a missing message is 404 {"msg": "Message not found"}; a missing queue is 404
{"msg": "Queue not found"}; a bad token is 401. Posting creates the queue.

Where this server departs from the hosted service (on purpose, for tests):
  * reservation timeouts below IronMQ's minimum of 30 s are accepted (down to 1 s) unless
    --strict-timeouts is given, so that lease tests take seconds instead of minutes;
  * the queue info carries "reserved" (messages under an unexpired reservation) beside "size"
    (messages waiting, delayed ones included, reserved ones not). IronMQ documents only
    "size" and "total_messages"; "reserved" is an extension of this server;
  * message bodies are limited to --max-message-size bytes (default 65536, IronMQ's 64 KB
    plan limit); a bigger body is refused with 413 and nothing of that request is stored.
"""

import argparse
import json
import secrets
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

MAX_N = 100
MAX_WAIT = 30
MAX_DELAY = 604_800
MIN_TIMEOUT_STRICT = 30
MAX_TIMEOUT = 86_400
DEFAULT_TIMEOUT = 60
DEFAULT_EXPIRATION = 604_800


class HttpError(Exception):
    def __init__(self, status, msg):
        super().__init__(msg)
        self.status = status
        self.msg = msg


class Message:
    __slots__ = ("id", "body", "available_at", "reserved_until", "reservation_id",
                 "reserved_count", "order", "expires_at")

    def __init__(self, mid, body, available_at, order, expires_at):
        self.id = mid
        self.body = body
        self.available_at = available_at
        self.reserved_until = 0.0
        self.reservation_id = None
        self.reserved_count = 0
        self.order = order
        self.expires_at = expires_at

    def reserved(self, now):
        return self.reservation_id is not None and self.reserved_until > now


class Queue:
    def __init__(self, project, name, options=None):
        self.project = project
        self.name = name
        self.messages = {}
        self.total = 0
        self.timeout = DEFAULT_TIMEOUT
        self.expiration = DEFAULT_EXPIRATION
        self.apply(options or {})

    def apply(self, options):
        if "message_timeout" in options:
            self.timeout = check_int(options["message_timeout"], "message_timeout", 1, MAX_TIMEOUT)
        if "message_expiration" in options:
            self.expiration = check_int(options["message_expiration"], "message_expiration", 1,
                                        2_592_000)

    def expire(self, now):
        """Drops messages past their expiration; a timed-out reservation goes to the front."""
        for m in list(self.messages.values()):
            if m.expires_at <= now:
                del self.messages[m.id]
            elif m.reservation_id is not None and m.reserved_until <= now:
                m.reservation_id = None
                m.order = -m.reserved_until  # the front, in the order the leases ran out

    def info(self, now):
        self.expire(now)
        reserved = sum(1 for m in self.messages.values() if m.reserved(now))
        return {
            "project_id": self.project,
            "name": self.name,
            "type": "pull",
            "size": len(self.messages) - reserved,
            "reserved": reserved,
            "total_messages": self.total,
            "message_timeout": self.timeout,
            "message_expiration": self.expiration,
        }

    def available(self, now):
        self.expire(now)
        ready = [m for m in self.messages.values()
                 if m.reservation_id is None and m.available_at <= now]
        ready.sort(key=lambda m: m.order)
        return ready


def check_int(v, name, lo, hi, allow_float=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise HttpError(400, f"{name} must be a number")
    if not allow_float and isinstance(v, float) and not v.is_integer():
        raise HttpError(400, f"{name} must be an integer")
    if v < lo or v > hi:
        raise HttpError(400, f"{name} must be between {lo} and {hi}")
    return v


class State:
    def __init__(self, token, max_size, strict):
        self.token = token
        self.max_size = max_size
        self.strict = strict
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.queues = {}
        self.next_id = int(time.time() * 1000) << 16
        self.next_order = 0

    def new_id(self):
        self.next_id += 1
        return str(self.next_id)

    def order(self):
        self.next_order += 1
        return self.next_order

    def queue(self, project, name, create=False):
        q = self.queues.get((project, name))
        if q is None:
            if not create:
                raise HttpError(404, "Queue not found")
            q = Queue(project, name)
            self.queues[(project, name)] = q
        return q

    def timeout_arg(self, body, default):
        t = body.get("timeout")
        if t is None:
            return default
        lo = MIN_TIMEOUT_STRICT if self.strict else 1
        return check_int(t, "timeout", lo, MAX_TIMEOUT, allow_float=not self.strict)


def reservation_matches(m, rid, now):
    return rid is not None and m.reservation_id == rid and m.reserved_until > now


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without this, Nagle's algorithm and delayed
    # ACKs stall each small answer on a kept-alive connection by ~40 ms.
    disable_nagle_algorithm = True
    server_version = "ironmq-v3-testserver/1"
    state: State = None  # set in main

    def log_message(self, fmt, *args):
        if self.server.verbose:
            sys.stderr.write("%s - %s\n" % (self.address_string(), fmt % args))

    # --- plumbing -------------------------------------------------------------------------

    def reply(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def read_body(self):
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise HttpError(400, "Bad Content-Length")
        if n > 128 * 1024 * 1024:
            raise HttpError(413, "Request too large")
        raw = self.rfile.read(n) if n else b""
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            raise HttpError(400, "Failed to decode JSON")
        if not isinstance(body, dict):
            raise HttpError(400, "Request body must be a JSON object")
        return body

    def handle_any(self, method):
        try:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            body = self.read_body() if method in ("POST", "PUT", "PATCH", "DELETE") else {}
            auth = self.headers.get("Authorization", "")
            token = auth[6:].strip() if auth.startswith("OAuth ") else None
            if token is None and "oauth" in query:
                token = query["oauth"][0]
            if token != self.state.token:
                raise HttpError(401, "Invalid project/token combination")
            parts = [unquote(p) for p in url.path.split("/")[1:]]
            if len(parts) < 4 or parts[0] != "3" or parts[1] != "projects" or parts[3] != "queues":
                raise HttpError(404, "Not found")
            project, rest = parts[2], parts[4:]
            status, obj = self.route(method, project, rest, query, body)
            self.reply(status, obj)
        except HttpError as e:
            self.reply(e.status, {"msg": e.msg})
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # a bug here, or input we did not foresee: answer, never hang
            sys.stderr.write(f"ironmq test server: {method} {self.path}: {e!r}\n")
            try:
                self.reply(500, {"msg": f"Internal error: {type(e).__name__}"})
            except OSError:
                pass

    def do_GET(self):
        self.handle_any("GET")

    def do_POST(self):
        self.handle_any("POST")

    def do_PUT(self):
        self.handle_any("PUT")

    def do_PATCH(self):
        self.handle_any("PATCH")

    def do_DELETE(self):
        self.handle_any("DELETE")

    # --- routes ---------------------------------------------------------------------------

    def route(self, method, project, rest, query, body):
        st = self.state
        if not rest or rest == [""]:
            if method != "GET":
                raise HttpError(405, "Method not allowed")
            with st.lock:
                names = sorted(n for (p, n) in st.queues if p == project)
            prefix = query.get("prefix", [""])[0]
            names = [n for n in names if n.startswith(prefix)]
            prev = query.get("previous", [None])[0]
            if prev is not None:
                names = [n for n in names if n > prev]
            try:
                per_page = min(int(query.get("per_page", ["30"])[0]), 100)
            except ValueError:
                raise HttpError(400, "per_page must be an integer")
            return 200, {"queues": [{"name": n} for n in names[:per_page]]}
        name = rest[0]
        tail = rest[1:]
        if not tail:
            return self.queue_route(method, project, name, body)
        if tail == ["clear"] and method == "POST":
            return self.clear(project, name)
        if tail == ["reservations"] and method == "POST":
            return self.reserve(project, name, body)
        if tail[0] == "messages":
            if len(tail) == 1:
                if method == "POST":
                    return self.post(project, name, body)
                if method == "GET":
                    return self.peek(project, name, query)
                if method == "DELETE":
                    if body.get("ids") is None:
                        return self.clear(project, name)
                    return self.delete_many(project, name, body)
            elif len(tail) == 2:
                if method == "GET":
                    return self.get_message(project, name, tail[1])
                if method == "DELETE":
                    return self.delete_one(project, name, tail[1], body)
            elif len(tail) == 3 and method == "POST":
                if tail[2] == "release":
                    return self.release(project, name, tail[1], body)
                if tail[2] == "touch":
                    return self.touch(project, name, tail[1], body)
        raise HttpError(404, "Not found")

    def queue_route(self, method, project, name, body):
        st = self.state
        now = time.time()
        with st.lock:
            if method == "GET":
                return 200, {"queue": st.queue(project, name).info(now)}
            if method == "PUT":
                options = body.get("queue") or {}
                if options.get("type", "pull") != "pull":
                    raise HttpError(400, "this test server has pull queues only")
                q = st.queues.get((project, name))
                if q is None:
                    q = Queue(project, name, options)
                    st.queues[(project, name)] = q
                else:
                    q.apply(options)
                info = q.info(now)
                del info["size"], info["total_messages"], info["reserved"]
                return 200, {"queue": info}
            if method == "PATCH":
                q = st.queue(project, name)
                q.apply(body.get("queue") or {})
                return 200, {"queue": q.info(now)}
            if method == "DELETE":
                if st.queues.pop((project, name), None) is None:
                    raise HttpError(404, "Queue not found")
                st.changed.notify_all()
                return 200, {"msg": "Deleted"}
        raise HttpError(405, "Method not allowed")

    def post(self, project, name, body):
        st = self.state
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise HttpError(400, "messages must be a non-empty list")
        if len(msgs) > MAX_N:
            raise HttpError(400, f"at most {MAX_N} messages per request")
        checked = []
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("body"), str):
                raise HttpError(400, "each message needs a string body")
            size = len(m["body"].encode())
            if size > st.max_size:
                raise HttpError(413, f"Message body of {size} bytes is over the limit of "
                                     f"{st.max_size} bytes")
            delay = check_int(m.get("delay", 0), "delay", 0, MAX_DELAY, allow_float=True)
            checked.append((m["body"], delay))
        now = time.time()
        with st.lock:
            q = st.queue(project, name, create=True)
            ids = []
            for text, delay in checked:
                mid = st.new_id()
                q.messages[mid] = Message(mid, text, now + delay, st.order(), now + q.expiration)
                q.total += 1
                ids.append(mid)
            st.changed.notify_all()
        return 201, {"ids": ids, "msg": "Messages put on queue."}

    def reserve(self, project, name, body):
        st = self.state
        n = check_int(body.get("n", 1), "n", 1, MAX_N)
        wait = check_int(body.get("wait", 0), "wait", 0, MAX_WAIT, allow_float=True)
        delete = bool(body.get("delete", False))
        deadline = time.time() + wait
        with st.lock:
            q = st.queue(project, name)
            timeout = st.timeout_arg(body, q.timeout)
            while True:
                now = time.time()
                if st.queues.get((project, name)) is not q:
                    return 200, {"messages": []}
                ready = q.available(now)[: int(n)]
                if ready or now >= deadline:
                    break
                # Wake on posts and releases; look again soon for leases and delays running out.
                st.changed.wait(min(deadline - now, 0.05))
            out = []
            for m in ready:
                m.reserved_count += 1
                if delete:
                    del q.messages[m.id]
                    out.append({"id": m.id, "body": m.body, "reserved_count": m.reserved_count})
                    continue
                m.reservation_id = secrets.token_hex(16)
                m.reserved_until = now + timeout
                out.append({"id": m.id, "body": m.body, "reserved_count": m.reserved_count,
                            "reservation_id": m.reservation_id})
        return 200, {"messages": out}

    def peek(self, project, name, query):
        st = self.state
        try:
            n = int(query.get("n", ["1"])[0])
        except ValueError:
            raise HttpError(400, "n must be an integer")
        check_int(n, "n", 1, MAX_N)
        with st.lock:
            q = st.queue(project, name)
            ready = q.available(time.time())[:n]
            return 200, {"messages": [{"id": m.id, "body": m.body,
                                       "reserved_count": m.reserved_count} for m in ready]}

    def get_message(self, project, name, mid):
        st = self.state
        with st.lock:
            q = st.queue(project, name)
            q.expire(time.time())
            m = q.messages.get(mid)
            if m is None:
                raise HttpError(404, "Message not found")
            return 200, {"message": {"id": m.id, "body": m.body,
                                     "reserved_count": m.reserved_count}}

    def _delete(self, q, mid, rid, now):
        """Deletes one message; raises as IronMQ answers when it cannot."""
        m = q.messages.get(mid)
        if m is None:
            raise HttpError(404, "Message not found")
        if m.reserved(now):
            if not reservation_matches(m, rid, now):
                raise HttpError(403, "Reservation has timed out" if rid else
                                "Message is reserved: a reservation_id is needed")
        elif rid is not None:
            # The reservation ran out (or never was): someone else may hold it next.
            raise HttpError(403, "Reservation has timed out")
        del q.messages[mid]

    def delete_one(self, project, name, mid, body):
        st = self.state
        with st.lock:
            q = st.queue(project, name)
            now = time.time()
            q.expire(now)
            self._delete(q, mid, body.get("reservation_id"), now)
            return 200, {"msg": "Deleted"}

    def delete_many(self, project, name, body):
        st = self.state
        ids = body.get("ids")
        if not isinstance(ids, list) or not ids:
            raise HttpError(400, "ids must be a non-empty list")
        if len(ids) > MAX_N:
            raise HttpError(400, f"at most {MAX_N} messages per request")
        with st.lock:
            q = st.queue(project, name)
            now = time.time()
            q.expire(now)
            failed = []
            for item in ids:
                if not isinstance(item, dict) or "id" not in item:
                    raise HttpError(400, "each id must be an object with an id")
                try:
                    self._delete(q, str(item["id"]), item.get("reservation_id"), now)
                except HttpError as e:
                    failed.append(e)
            if failed:
                # The deletable ones are gone; the answer names how many were not.
                status = 403 if any(e.status == 403 for e in failed) else 404
                raise HttpError(status, f"{len(failed)} of {len(ids)} messages not deleted: "
                                        f"{failed[0].msg}")
            return 200, {"msg": "Deleted"}

    def clear(self, project, name):
        st = self.state
        with st.lock:
            q = st.queue(project, name)
            q.messages.clear()
            return 200, {"msg": "Cleared"}

    def release(self, project, name, mid, body):
        st = self.state
        delay = check_int(body.get("delay", 0), "delay", 0, MAX_DELAY, allow_float=True)
        with st.lock:
            q = st.queue(project, name)
            now = time.time()
            q.expire(now)
            m = q.messages.get(mid)
            if m is None:
                raise HttpError(404, "Message not found")
            if not reservation_matches(m, body.get("reservation_id"), now):
                raise HttpError(404, "Reservation has timed out")
            m.reservation_id = None
            m.reserved_until = 0.0
            m.available_at = now + delay
            m.order = -now  # the front of the queue
            st.changed.notify_all()
            return 200, {"msg": "Released"}

    def touch(self, project, name, mid, body):
        st = self.state
        with st.lock:
            q = st.queue(project, name)
            now = time.time()
            q.expire(now)
            timeout = st.timeout_arg(body, q.timeout)
            m = q.messages.get(mid)
            if m is None:
                raise HttpError(404, "Message not found")
            if not reservation_matches(m, body.get("reservation_id"), now):
                raise HttpError(404, "Reservation has timed out")
            m.reservation_id = secrets.token_hex(16)
            m.reserved_until = now + timeout
            return 200, {"reservation_id": m.reservation_id, "msg": "Touched"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8787)
    ap.add_argument("--token", required=True, help="the OAuth token every request must carry")
    ap.add_argument("--max-message-size", type=int, default=65536,
                    help="largest message body in bytes (IronMQ: 64 KB, 256 KB on some plans)")
    ap.add_argument("--strict-timeouts", action="store_true",
                    help="refuse reservation timeouts under 30 s, as the hosted IronMQ does")
    ap.add_argument("--verbose", action="store_true", help="log every request")
    args = ap.parse_args()
    Handler.state = State(args.token, args.max_message_size, args.strict_timeouts)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    server.verbose = args.verbose
    print(f"IronMQ v3 test server on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
