"""Conveyor's Kubernetes operator (kopf). Reading order: handlers.py (triggers) -> reconcile.py (one
reconcile as a pure plan, plan.py) -> render.py (manifests) and phase.py (failures, phases, conditions) ->
k8s.py (the only module that calls the API). Never imports torch."""
