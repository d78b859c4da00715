"""Strict check of meshfed's /debug/config_dump output, for tests/debug_surface.rs.

Usage: parse_config_dump.py FILE

Parses FILE (JSON) as envoy.admin.v3.ConfigDump with the protobuf runtime's own JSON parser and the
Envoy API protos of xds-protos (an implementation independent of meshfed's), the way
`istioctl proxy-config ... --file` does: unknown fields are errors, and every google.protobuf.Any
(nested typed_config too) must resolve to a known message. The modules of the types the dump names
are imported first, so that the default descriptor pool knows them.

Prints a JSON summary on stdout: the sections (@type of each config, in order), the names of the
clusters, listeners, route configurations and endpoint assignments, and every Any type seen.
Exits 1 with a message on stderr if the dump does not parse.
"""

import importlib
import json
import pkgutil
import sys

from google.protobuf import json_format

# The types every dump has, and the extensions meshfed uses.
from envoy.admin.v3 import config_dump_pb2  # noqa: F401  (ConfigDump, BootstrapConfigDump, ...)
from envoy.admin.v3 import config_dump_shared_pb2  # noqa: F401  (Clusters/Listeners/Routes/Endpoints...)
from envoy.config.bootstrap.v3 import bootstrap_pb2  # noqa: F401
from envoy.config.cluster.v3 import cluster_pb2  # noqa: F401
from envoy.config.endpoint.v3 import endpoint_pb2  # noqa: F401
from envoy.config.listener.v3 import listener_pb2  # noqa: F401
from envoy.config.route.v3 import route_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2  # noqa: F401
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401

from envoy.admin.v3.config_dump_pb2 import ConfigDump


def any_types(value, out):
    """Every "@type" in a JSON value."""
    if isinstance(value, dict):
        t = value.get("@type")
        if isinstance(t, str):
            out.add(t)
        for v in value.values():
            any_types(v, out)
    elif isinstance(value, list):
        for v in value:
            any_types(v, out)


def first_difference(a, b, path="$"):
    """Where two JSON values first differ, for error messages."""
    if type(a) is not type(b):
        return f"{path}: {a!r} != {b!r}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}.{k}: only in {'input' if k in a else 'reprint'}: {a.get(k, b.get(k))!r}"[:400]
            d = first_difference(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} items != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{path}: {a!r} != {b!r}"


def import_package_of(type_url):
    """Imports every *_pb2 module of the package of the message a type URL names (so that the
    default pool knows the message). Unknown packages are left for the parser to report."""
    full_name = type_url.rsplit("/", 1)[-1]
    package = full_name.rsplit(".", 1)[0]
    try:
        pkg = importlib.import_module(package)
    except ImportError:
        return
    for mod in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
        if mod.name.endswith("_pb2"):
            importlib.import_module(package + "." + mod.name)


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1], encoding="utf-8") as f:
        text = f.read()
    try:
        raw = json.loads(text)
    except ValueError as e:
        print(f"not JSON: {e}", file=sys.stderr)
        return 1
    types = set()
    any_types(raw, types)
    for t in sorted(types):
        import_package_of(t)

    dump = ConfigDump()
    try:
        json_format.Parse(text, dump, ignore_unknown_fields=False)
    except json_format.ParseError as e:
        print(f"not a valid envoy.admin.v3.ConfigDump: {e}", file=sys.stderr)
        return 1

    sections = []
    names = {"clusters": [], "listeners": [], "routes": [], "endpoints": []}
    for cfg in dump.configs:
        name = cfg.TypeName()
        sections.append(name)
        if name == "envoy.admin.v3.ClustersConfigDump":
            m = config_dump_shared_pb2.ClustersConfigDump()
            cfg.Unpack(m)
            for c in m.dynamic_active_clusters:
                cl = cluster_pb2.Cluster()
                if not c.cluster.Unpack(cl):
                    print(f"a dynamic cluster is a {c.cluster.type_url}", file=sys.stderr)
                    return 1
                names["clusters"].append(cl.name)
        elif name == "envoy.admin.v3.ListenersConfigDump":
            m = config_dump_shared_pb2.ListenersConfigDump()
            cfg.Unpack(m)
            for dl in m.dynamic_listeners:
                ln = listener_pb2.Listener()
                if not dl.active_state.listener.Unpack(ln) or ln.name != dl.name:
                    print(f"dynamic listener {dl.name} does not hold that listener", file=sys.stderr)
                    return 1
                names["listeners"].append(ln.name)
        elif name == "envoy.admin.v3.RoutesConfigDump":
            m = config_dump_shared_pb2.RoutesConfigDump()
            cfg.Unpack(m)
            for r in m.dynamic_route_configs:
                rc = route_pb2.RouteConfiguration()
                r.route_config.Unpack(rc)
                names["routes"].append(rc.name)
        elif name == "envoy.admin.v3.EndpointsConfigDump":
            m = config_dump_shared_pb2.EndpointsConfigDump()
            cfg.Unpack(m)
            for e in m.dynamic_endpoint_configs:
                cla = endpoint_pb2.ClusterLoadAssignment()
                e.endpoint_config.Unpack(cla)
                names["endpoints"].append(cla.cluster_name)

    # Printed back by the protobuf runtime, the message is the input: nothing was dropped or
    # misread, and meshfed writes proto3 JSON as the reference implementation does.
    again = json_format.MessageToDict(dump, preserving_proto_field_name=True)
    if again != raw:
        print(f"the dump does not print back the same: {first_difference(raw, again)}", file=sys.stderr)
        return 1

    print(json.dumps({"sections": sections, "any_types": sorted(types), **names}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
