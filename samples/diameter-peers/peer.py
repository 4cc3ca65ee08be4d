#!/usr/bin/env python3
"""Real Diameter peers (PyPI `python-diameter`) for the local demo and the end-to-end tests.

    peer.py server --host 127.0.0.1 --port 3869
    peer.py client --host 127.0.0.2 --port 3868 --requests 2 --linger 2.5

The server answers Credit-Control requests with Result-Code 2001 (DIAMETER_SUCCESS). The client
connects (CER/CEA), sends its CCRs and prints one line per answer, stays idle long enough for a
watchdog exchange (DWR/DWA), then disconnects (DPR/DPA) and exits 0; any failure exits 1.
"""

import argparse
import logging
import signal
import sys
import threading
import time

from diameter.message import constants
from diameter.message.commands.credit_control import CreditControlRequest
from diameter.node import Node
from diameter.node.application import SimpleThreadingApplication

REALM = "demo.realm"
SERVER = "server.demo.realm"
CLIENT = "client.demo.realm"
CREDIT_CONTROL = constants.APP_DIAMETER_CREDIT_CONTROL_APPLICATION


def answer_credit_control(app, request):
    answer = app.generate_answer(request)
    answer.result_code = constants.E_RESULT_CODE_DIAMETER_SUCCESS
    answer.auth_application_id = CREDIT_CONTROL
    answer.cc_request_type = request.cc_request_type
    answer.cc_request_number = request.cc_request_number
    return answer


def serve(args):
    # Handlers first: a SIGTERM at any point after start-up ends in a clean stop.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    node = Node(SERVER, REALM, ip_addresses=[args.host], tcp_port=args.port)
    client = node.add_peer(f"aaa://{CLIENT}", REALM)
    app = SimpleThreadingApplication(CREDIT_CONTROL, is_auth_application=True, request_handler=answer_credit_control)
    node.add_application(app, [client])
    node.start()
    print(f"serving Diameter on {args.host}:{args.port}", flush=True)
    while not stop.wait(0.5):
        pass
    node.stop(wait_timeout=5)
    return 0


def call(args):
    node = Node(CLIENT, REALM)
    # Timers (the idle watchdog among them) are checked each time the node wakes up.
    node.wakeup_interval = 0.2
    server = node.add_peer(f"aaa://{SERVER}:{args.port}", REALM, ip_addresses=[args.host], is_persistent=True, is_default=True)
    # A short idle timeout makes the node send a Device-Watchdog-Request while it lingers.
    server.idle_timeout = args.watchdog
    app = SimpleThreadingApplication(CREDIT_CONTROL, is_auth_application=True)
    node.add_application(app, [server])
    node.start()
    try:
        app.wait_for_ready(timeout=args.timeout)
        for number in range(args.requests):
            request = CreditControlRequest()
            request.session_id = node.session_generator.next_id()
            request.origin_host = node.origin_host.encode()
            request.origin_realm = node.realm_name.encode()
            request.destination_realm = REALM.encode()
            request.auth_application_id = CREDIT_CONTROL
            request.service_context_id = "32251@3gpp.org"
            request.cc_request_type = constants.E_CC_REQUEST_TYPE_EVENT_REQUEST
            request.cc_request_number = number
            answer = app.send_request(request, timeout=args.timeout)
            header = answer.header
            print(
                f"CCA result={answer.result_code} hop_by_hop={header.hop_by_hop_identifier} "
                f"end_to_end={header.end_to_end_identifier}",
                flush=True,
            )
        time.sleep(args.linger)
    finally:
        node.stop(wait_timeout=10)
    print("disconnected", flush=True)
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("--host", required=True, help="address to listen on (server) or connect to (client)")
    parser.add_argument("--port", type=int, default=3868)
    parser.add_argument("--requests", type=int, default=1, help="Credit-Control requests to send (client)")
    parser.add_argument("--linger", type=float, default=2.5, help="idle seconds before disconnecting (client)")
    parser.add_argument("--watchdog", type=int, default=1, help="idle seconds before a DWR (client)")
    parser.add_argument("--timeout", type=float, default=15.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return serve(args) if args.role == "server" else call(args)
    except Exception as error:  # a failed exchange must fail the caller's test, visibly
        logging.exception("diameter %s failed: %s", args.role, error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
