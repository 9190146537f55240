"""``pacs-ai send`` and ``pacs-ai echo``: C-STORE and C-ECHO as a service class user."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from pacs_ai.delivery.scu import Outgoing, Peer, SendResult, collect_files, send

DEFAULT_CALLING_AE = "PACS_AI_SCU"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "send",
        help="send DICOM files or folders to a peer with C-STORE",
        description="Send files to HOST PORT; folders are searched recursively for DICOM "
        "(Part 10) files, other files in them are skipped. Prints one line per file with its "
        "C-STORE status; exits 1 if any file was not stored with status 0x0000 Success.",
    )
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    _ae_args(p)
    p.add_argument("--quiet", "-q", action="store_true", help="print only failures and totals")
    p.set_defaults(handler=_send)

    e = sub.add_parser("echo", help="verify a DICOM peer with C-ECHO")
    e.add_argument("host")
    e.add_argument("port", type=int)
    _ae_args(e)
    e.set_defaults(handler=_echo)


def _ae_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--aet", default=DEFAULT_CALLING_AE, help="our (calling) AE title")
    p.add_argument("--aec", default="PACS_AI", help="the peer's (called) AE title")
    p.add_argument("--timeout", type=float, default=30.0, help="network timeouts in seconds")


def _peer(args: argparse.Namespace) -> Peer:
    return Peer(
        host=args.host,
        port=args.port,
        called_ae=args.aec,
        calling_ae=args.aet,
        acse_timeout=args.timeout,
        dimse_timeout=args.timeout,
        network_timeout=args.timeout,
    )


def _describe(r: SendResult) -> str:
    status = f"0x{r.status:04X}" if r.status is not None else "------"
    extra = f"  ({r.error})" if r.error else ""
    return f"{r.category.upper():8s} {status}  {r.item}{extra}"


def _send(args: argparse.Namespace) -> int:
    files, skipped = collect_files(args.paths)
    if skipped:
        print(f"skipped {len(skipped)} non-DICOM files in the folders given", file=sys.stderr)
    if not files:
        print("pacs-ai send: no DICOM files found", file=sys.stderr)
        return 1
    items = [Outgoing(label=str(f), path=f) for f in files]
    with tqdm(total=len(items), unit="file", disable=None, file=sys.stderr) as bar:

        def progress(r: SendResult) -> None:
            bar.update(1)
            if not args.quiet or not r.ok:
                tqdm.write(_describe(r))

        results = send(_peer(args), items, progress)
    counts: dict[str, int] = {}
    for r in results:
        counts[r.category] = counts.get(r.category, 0) + 1
    summary = ", ".join(f"{n} {c}" for c, n in sorted(counts.items()))
    print(f"{len(results)} files: {summary}")
    return 0 if all(r.ok for r in results) else 1


def _echo(args: argparse.Namespace) -> int:
    from pynetdicom import AE

    peer = _peer(args)
    ae = AE(ae_title=peer.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.called_ae)
    if not assoc.is_established:
        print(f"C-ECHO failed: could not associate with {peer.called_ae}@{peer.host}:{peer.port}")
        return 1
    try:
        rsp = assoc.send_c_echo()
    finally:
        assoc.release()
    status = rsp.get("Status") if rsp else None
    if status == 0:
        print(f"C-ECHO OK: {peer.called_ae}@{peer.host}:{peer.port}")
        return 0
    print(f"C-ECHO failed: status {status}")
    return 1
