"""The commands that speak to the controller over gRPC: status, lookup, ls, evict, clear, watch, top, pin,
unpin, move, prefetch (docs/control.md).

Each takes --address (default control.address), --token (default control.token, else the embedded
default's token file), --output table|json, --timeout, and for TLS --tls-ca, --tls-cert, --tls-key
(defaults control.tls_ca, tls_client_cert, tls_client_key). Exit codes: 0 ok; 1 UNAVAILABLE, DEADLINE,
NOT_FOUND and other runtime failures; 2 INVALID_ARGUMENT or bad usage; 3 UNAUTHENTICATED or
PERMISSION_DENIED.
"""

from __future__ import annotations

import base64
import json
import sys
import time

import grpc
from google.protobuf.json_format import MessageToDict

from ..errors import InvalidArgument
from ..keys import as_token_array
from ..proto import kvstore_pb2 as pb
from ..proto import tiers as pb_tiers
from .common import EXIT_AUTH, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UsageError, add_config_args, human_bytes, load, show, table

_EXIT_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_AUTH,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_AUTH,
}
_TIER_CHOICES = ["cpu", "disk", "gpu", "remote"]


def add(sub) -> None:
    def command(name: str, help: str, description: str):
        parser = sub.add_parser(name, help=help, description=description)
        add_config_args(parser)
        parser.add_argument("--address", default=None, help="controller host:port (default: control.address)")
        parser.add_argument("--token", default=None,
                            help="bearer token (default: control.token / $KVSTORE_CONTROL__TOKEN, else the "
                                 "token `kvstore serve` saved in ~/.cache/kvstore/control-token)")
        parser.add_argument("--output", choices=["table", "json"], default="table")
        parser.add_argument("--timeout", type=float, default=5.0, help="deadline of each RPC in seconds")
        parser.add_argument("--tls-ca", default=None, metavar="PEM",
                            help="connect with TLS, verifying the controller with this CA bundle "
                                 "(default: control.tls_ca; none: plaintext unless --tls-cert is given)")
        parser.add_argument("--tls-cert", default=None, metavar="PEM",
                            help="client certificate for mTLS, with --tls-key (default: control.tls_client_cert)")
        parser.add_argument("--tls-key", default=None, metavar="PEM",
                            help="its private key (default: control.tls_client_key)")
        parser.set_defaults(func=run, control_command=name)
        return parser

    def namespace_arg(parser, required_help: str) -> None:
        parser.add_argument("--namespace", "-n", default=None,
                            help=f"namespace digest (hex) or model name; {required_help}")

    command("status", "nodes, tiers, bytes used / capacity, hit rate",
            "Show what the store holds: per node and tier the chunks, bytes used and capacity, pinned bytes, "
            "evictions; the lookup hit rate and the namespaces the token may see.")

    def prompt_args(parser) -> None:
        """A prompt: token ids, --text with --tokenizer, or --hashes (read by _query)."""
        namespace_arg(parser, "default: the only namespace, if there is one")
        parser.add_argument("tokens", nargs="*", type=int, help="token ids")
        parser.add_argument("--text", default=None, help="text to tokenize (needs --tokenizer)")
        parser.add_argument("--tokenizer", default=None, help="a Hugging Face tokenizer directory")
        parser.add_argument("--hashes", nargs="*", default=None, help="chunk hashes in hex instead of tokens")

    lookup = command("lookup", "how much of a prompt is cached, per node and tier",
                     "Look up a prompt's longest cached prefix. Give token ids (kvstore lookup 1 2 3 ...), or "
                     "--text with --tokenizer <hf dir>, or chunk hashes with --hashes.")
    prompt_args(lookup)

    ls = command("ls", "list cached chunks (paged)", "List chunks by namespace and tier, one page at a time.")
    namespace_arg(ls, "default: every namespace")
    ls.add_argument("--tier", choices=_TIER_CHOICES, default=None)
    ls.add_argument("--limit", type=int, default=100, help="page size")
    ls.add_argument("--page", default="", help="page token printed by the previous page")
    ls.add_argument("--pinned", action="store_true", help="only chunks that pin leases hold")
    ls.add_argument("--node", default="", help="only this node's chunks (default: every node, one after another)")

    evict = command("evict", "drop chunks of a prompt from tiers", "Evict a prompt's chunks (tokens or --hashes).")
    namespace_arg(evict, "default: the only namespace, if there is one")
    evict.add_argument("tokens", nargs="*", type=int, help="token ids")
    evict.add_argument("--hashes", nargs="*", default=None, help="chunk hashes in hex")
    evict.add_argument("--tier", action="append", choices=["cpu", "disk"], default=None,
                       help="tier to evict from (repeatable; default both)")

    clear = command("clear", "remove every chunk of a namespace or tenant",
                    "Clear a namespace (--namespace) or every namespace of a tenant (--tenant).")
    namespace_arg(clear, "or --tenant")
    clear.add_argument("--tenant", default=None)

    watch = command("watch", "tail stored/removed/cleared events",
                    "Print events as they happen until interrupted (or --count events).")
    namespace_arg(watch, "default: every namespace")
    watch.add_argument("--count", type=int, default=0, help="stop after this many events (0: never)")
    watch.add_argument("--since", type=int, default=0,
                       help="replay the events after this sequence number still buffered (0: only new ones)")

    pin = command("pin", "keep a prompt's chunks in the arena for a while",
                  "Pin a prompt's stored chunks (the same arguments as lookup) in the arena of every node that "
                  "holds them, disk-only ones promoted first, so eviction skips them until the lease is released "
                  "(kvstore unpin LEASE) or its TTL ends. Prints the lease. --renew LEASE gives a lease --ttl "
                  "seconds from now instead.")
    prompt_args(pin)
    pin.add_argument("--ttl", type=float, default=3600.0,
                     help="seconds the pin lasts (default 3600; at most the agent's agent.max_pin_ttl_s)")
    pin.add_argument("--renew", default=None, metavar="LEASE", help="renew this lease (no prompt needed)")

    unpin = command("unpin", "release a pin lease", "Release a lease that kvstore pin printed.")
    unpin.add_argument("lease")

    move = command("move", "move a prompt's chunks to the arena or to disk",
                   "Move a prompt's stored chunks between a node's tiers: --to cpu promotes disk-only chunks "
                   "into the arena; --to disk writes them to disk now and drops their arena copies (pinned ones "
                   "stay). With --node (a cluster member), that node pulls every chunk of the prompt some node "
                   "holds and the other nodes drop theirs.")
    prompt_args(move)
    move.add_argument("--to", required=True, choices=["cpu", "disk"], help="target tier")
    move.add_argument("--node", default="", help="target node (default: the node the controller fronts)")

    prefetch = command("prefetch", "bring a prompt's chunks into the arena",
                       "Bring a prompt's chunks into the node's arena: from disk now and, on a cluster agent, from "
                       "other nodes in the background. Prints how many are not in the arena yet.")
    prompt_args(prefetch)

    top = command("top", "live view of nodes and tiers, with rates",
                  "Refresh Stats every --interval seconds: per node and tier the chunks, bytes used / capacity, "
                  "pinned bytes and evictions per second; per node the lookup and get hit rates and the rates "
                  "(lookups, chunks served, missed and stored, bytes read from and written to disk) over the "
                  "last interval. --output json prints one JSON object per refresh.")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    top.add_argument("--count", type=int, default=0, help="stop after this many refreshes (0: until interrupted)")


def run(args) -> int:
    from ..control.client import ControlClient, resolve_token
    from ..control.tls import ClientTLS
    from .top import cmd_top

    cfg = load(args)
    token = resolve_token(args.token, cfg.control.token)
    address = args.address or cfg.control.address
    tls = ClientTLS.from_options(args.tls_ca or cfg.control.tls_ca, args.tls_cert or cfg.control.tls_client_cert,
                                 args.tls_key or cfg.control.tls_client_key)
    with ControlClient(address, token, timeout=args.timeout, tls=tls) as client:
        try:
            return {**_COMMANDS, "top": cmd_top}[args.control_command](client, args)
        except grpc.RpcError as exc:
            code = exc.code()
            hint = " (a TLS controller? control.tls_cert is set: pass --tls-ca)" \
                if code == grpc.StatusCode.UNAVAILABLE and tls is None and cfg.control.tls_cert else ""
            print(f"kvstore: {code.name}: {exc.details()} (controller {address}){hint}", file=sys.stderr)
            return _EXIT_BY_CODE.get(code, EXIT_FAILURE)
        except UsageError as exc:
            print(f"kvstore: {exc}", file=sys.stderr)
            return EXIT_USAGE


_HEX_FIELDS = {"namespace", "digest", "hash", "block_hashes", "parent_block_hash", "chunk_hashes"}


def _hex_bytes(value, key: str = ""):
    """MessageToDict writes bytes as base64; hashes and digests read better (and grep) as hex."""
    if isinstance(value, dict):
        return {k: _hex_bytes(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_hex_bytes(v, key) for v in value]
    if key in _HEX_FIELDS and isinstance(value, str):
        return base64.b64decode(value).hex()
    return value


def to_json(message) -> str:
    return json.dumps(_hex_bytes(MessageToDict(message, preserving_proto_field_name=True)))


def _emit(args, message, render) -> int:
    if args.output == "json":
        print(to_json(message))
    else:
        render(message)
    return EXIT_OK


def _namespace(client, args, required: bool = True) -> bytes:
    value = args.namespace
    if value:
        try:
            digest = bytes.fromhex(value)
            if len(digest) == 16:
                return digest
        except ValueError:
            pass
    if not value and not required:
        return b""
    namespaces = [ns for node in client.Stats(pb.StatsRequest()).nodes for ns in node.namespaces]
    matches = [ns for ns in namespaces if not value or ns.description.get("model") == value]
    digests = list(dict.fromkeys(ns.digest for ns in matches))
    if len(digests) == 1:
        return digests[0]
    known = ", ".join(f"{ns.digest.hex()} ({ns.description.get('model', '?')})" for ns in namespaces) or "none"
    what = f"no namespace matches {value!r}" if value and not digests else "several namespaces match" \
        if digests else "no namespace to choose"
    raise UsageError(f"{what}; pass --namespace HEX (known: {known})")


def _query(client, args) -> pb.ChunkQuery:
    namespace = _namespace(client, args)
    if args.hashes:
        try:
            return pb.ChunkQuery(namespace=namespace, chunk_hashes_packed=b"".join(bytes.fromhex(h) for h in args.hashes))
        except ValueError:
            raise UsageError("--hashes takes hex strings") from None
    tokens = list(args.tokens)
    if getattr(args, "text", None) is not None:
        if not args.tokenizer:
            raise UsageError("--text needs --tokenizer <hf dir>")
        from transformers import AutoTokenizer

        tokens = AutoTokenizer.from_pretrained(args.tokenizer).encode(args.text)
    if not tokens:
        raise UsageError("give token ids, --text with --tokenizer, or --hashes")
    try:
        packed = as_token_array(tokens)
    except (InvalidArgument, ValueError, OverflowError):
        raise UsageError("token ids must be integers in [0, 2^32)") from None
    return pb.ChunkQuery(namespace=namespace, token_ids_le32=packed.tobytes())


def cmd_status(client, args) -> int:
    reply = client.Stats(pb.StatsRequest())
    health = client.Health(pb.HealthRequest())

    def render(message) -> None:
        for node in message.nodes:
            rows = table(f"node {node.node}: {pb.HealthResponse.Status.Name(health.status).lower()}, "
                           f"hit rate {node.hit_rate:.1%}",
                           ["tier", "chunks", "used / capacity", "use", "pinned", "evictions"])
            for t in node.tiers:
                use = t.used_bytes / t.capacity_bytes if t.capacity_bytes else 0.0
                rows.add_row(pb_tiers.label(t.tier), str(t.chunks),
                              f"{human_bytes(t.used_bytes)} / {human_bytes(t.capacity_bytes)}", f"{use:.1%}",
                              human_bytes(t.pinned_bytes), str(t.evictions))
            c = node.counters
            namespaces = table("namespaces", ["digest", "model", "tenant", "chunk tokens"])
            for ns in node.namespaces:
                namespaces.add_row(ns.digest.hex(), ns.description.get("model", "?"),
                                   ns.description.get("tenant", "") or "-", ns.description.get("chunk_tokens", "?"))
            show(rows, f"lookups {c.get('lookups', 0)}: {c.get('lookup_hit_chunks', 0)} chunks hit, "
                          f"{c.get('lookup_miss_chunks', 0)} missed; stored {c.get('chunks_stored', 0)}", namespaces)

    return _emit(args, reply, render)


def cmd_lookup(client, args) -> int:
    reply = client.Lookup(pb.LookupRequest(query=_query(client, args)))

    def render(message) -> None:
        share = message.matched_chunks / message.query_chunks if message.query_chunks else 0.0
        # the summary is a line of its own: as a table title it would wrap to the table's width
        summary = (f"matched {message.matched_tokens} tokens = {message.matched_chunks} of "
                   f"{message.query_chunks} chunks ({share:.0%}), {message.chunk_tokens} tokens per chunk")
        rows = table("", ["node", "prefix chunks", "prefix tokens", "by tier"])
        for node in message.nodes:
            rows.add_row(node.node, str(node.matched_chunks), str(node.matched_tokens),
                          ", ".join(f"{pb_tiers.label(t.tier)} {t.chunks}" for t in node.per_tier))
        show(summary, table)

    return _emit(args, reply, render)


def cmd_ls(client, args) -> int:
    request = pb.ListChunksRequest(namespace=_namespace(client, args, required=False), page_size=args.limit,
                                   page_token=args.page, pinned_only=args.pinned, node=args.node,
                                   tier=pb_tiers.named(args.tier) if args.tier else pb.TIER_UNSPECIFIED)
    reply = client.ListChunks(request)

    def render(message) -> None:
        rows = table(f"{len(message.chunks)} chunks", ["chunk hash", "namespace", "tiers", "node"])
        for chunk in message.chunks:
            rows.add_row(chunk.hash.hex(), chunk.namespace.hex()[:12],
                          ",".join(pb_tiers.label(t) for t in chunk.tiers), chunk.node)
        show(rows, f"next page: --page {message.next_page_token}" if message.next_page_token else "last page")

    return _emit(args, reply, render)


def cmd_evict(client, args) -> int:
    tiers = [pb_tiers.named(t) for t in args.tier or []]
    reply = client.Evict(pb.EvictRequest(query=_query(client, args), tiers=tiers))
    return _emit(args, reply, lambda m: show(f"evicted {m.cpu_chunks} chunks from cpu, {m.disk_chunks} from "
                                               f"disk; {m.pinned_chunks} pinned chunks left in place"))


def cmd_clear(client, args) -> int:
    if args.tenant is not None:
        request = pb.ClearRequest(tenant=args.tenant)
    elif args.namespace:
        request = pb.ClearRequest(namespace=_namespace(client, args))
    else:
        raise UsageError("clear needs --namespace or --tenant")
    reply = client.Clear(request)
    return _emit(args, reply, lambda m: show(f"cleared {m.namespaces} namespace(s): {m.cpu_chunks} chunks from "
                                               f"cpu, {m.disk_chunks} from disk"))


def cmd_pin(client, args) -> int:
    if args.renew:
        reply = client.Pin(pb.PinRequest(lease=args.renew, ttl_s=args.ttl))
        return _emit(args, reply, lambda m: show(f"renewed {m.pinned_chunks} pinned chunks for {args.ttl:g} s: "
                                                   f"lease {m.lease}"))
    reply = client.Pin(pb.PinRequest(query=_query(client, args), ttl_s=args.ttl))
    return _emit(args, reply, lambda m: show(f"pinned {m.pinned_chunks} chunks for {args.ttl:g} s: lease {m.lease}"
                                               if m.lease else "nothing pinned: none of the prompt's chunks is stored"))


def cmd_unpin(client, args) -> int:
    reply = client.Unpin(pb.UnpinRequest(lease=args.lease))
    return _emit(args, reply, lambda m: show(f"released lease {args.lease}"))


def cmd_move(client, args) -> int:
    reply = client.Move(pb.MoveRequest(query=_query(client, args), to_tier=pb_tiers.named(args.to), to_node=args.node))
    where = f" on node {args.node}" if args.node else ""
    return _emit(args, reply, lambda m: show(f"{m.moved_chunks} chunks of the prompt are in {args.to}{where} now"))


def cmd_prefetch(client, args) -> int:
    reply = client.Prefetch(pb.PrefetchRequest(query=_query(client, args)))
    return _emit(args, reply, lambda m: show(f"{m.missing_chunks} chunks of the prompt are not in the arena"))


def cmd_watch(client, args) -> int:
    stream = client.watch(pb.WatchEventsRequest(namespace=_namespace(client, args, required=False),
                                                since=args.since))
    seen = 0
    try:
        for event in stream:
            if args.output == "json":
                print(to_json(event), flush=True)
            else:
                kind = event.WhichOneof("kind")
                body = getattr(event, kind)
                hashes = list(getattr(body, "block_hashes", []))
                medium = getattr(body, "medium", "")
                when = time.strftime("%H:%M:%S", time.localtime(event.timestamp))
                lost = f" ({event.dropped} events lost before this)" if event.dropped else ""
                print(f"{when} #{event.seq} {kind:<8} {medium:<4} ns {event.namespace.hex()[:12]} "
                      f"{len(hashes)} chunk(s) {' '.join(h.hex()[:8] for h in hashes[:4])}"
                      f"{' ...' if len(hashes) > 4 else ''}{lost}", flush=True)
            seen += 1
            if args.count and seen >= args.count:
                stream.cancel()
                break
    except KeyboardInterrupt:
        stream.cancel()
    return EXIT_OK


_COMMANDS = {"status": cmd_status, "lookup": cmd_lookup, "ls": cmd_ls, "evict": cmd_evict, "clear": cmd_clear,
             "watch": cmd_watch, "pin": cmd_pin, "unpin": cmd_unpin, "move": cmd_move,
             "prefetch": cmd_prefetch}
