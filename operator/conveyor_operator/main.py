"""``conveyor operator``: runs the kopf operator (the equivalent of ``kopf run -m conveyor_operator.handlers``)
with Conveyor's defaults: JSON logs, a Prometheus endpoint, kopf's liveness endpoint, and leader
election through kopf peering.

kopf peering pauses an operator while a live peer of *higher* priority exists (equal priorities pause
everyone), so each replica takes a random priority unless ``--priority`` is given: the highest one
acts, the others wait, and when it dies (its peering record expires) the next highest takes over.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys

from conveyor import log as conveyor_log


def kopf_options(args: argparse.Namespace) -> dict[str, object]:
    """kopf.run's arguments from the command line (pure, tested)."""
    namespaces = list(args.namespace or [])
    if namespaces and args.all_namespaces:
        raise SystemExit("conveyor operator: use --namespace or --all-namespaces, not both")
    standalone = bool(args.standalone)
    return {
        "clusterwide": not namespaces,
        "namespaces": namespaces,
        "standalone": standalone,
        "peering_name": None if standalone else args.peering,
        "priority": args.priority if args.priority is not None else random.randint(1, 1_000_000),
        "liveness_endpoint": f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port > 0 else None,
    }


class _DropKopfSettings(logging.Filter):
    """kopf attaches its whole OperatorSettings to each object log record; as a JSON field that is a
    kilobyte of noise per line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("settings", None)
        return True


def _quiet_kopf(verbose: bool) -> None:
    # Our own log lines and Events cover every transition; kopf's per-handler "succeeded" lines are
    # only worth seeing with --verbose.
    logging.getLogger("kopf").setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.DEBUG if verbose else logging.WARNING)  # probes
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropKopfSettings())


def main(args: argparse.Namespace) -> int:
    import kopf

    from conveyor_operator import handlers, k8s, metrics

    conveyor_log.configure("DEBUG" if args.verbose else "INFO", component="conveyor-operator")
    _quiet_kopf(args.verbose)
    options = kopf_options(args)
    try:
        k8s.load_config()
    except Exception as err:  # no in-cluster account and no usable kubeconfig
        print(
            f"conveyor operator: no Kubernetes configuration ({err}); set KUBECONFIG or run in a pod",
            file=sys.stderr,
        )
        return 2
    if not options["standalone"]:
        k8s.ensure_peering(args.peering, list(args.namespace or []), not args.namespace)
    metrics.serve(args.metrics_port)
    logging.getLogger(__name__).info(
        "starting",
        extra={"handlers": handlers.__name__, **{k: v for k, v in options.items() if k != "namespaces"}},
    )
    kopf.run(**options)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    from conveyor.cli import main as cli_main

    sys.exit(cli_main(["operator", *sys.argv[1:]]))
