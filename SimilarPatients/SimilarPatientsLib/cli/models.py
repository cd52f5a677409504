"""``similar-patients models list|accept``: the embedding models, their weights and licences."""

from __future__ import annotations

from .output import as_json


def add(verbs) -> None:
    models_parser = verbs.add_parser("models", help="list the embedding models, or accept a weight licence")
    model_actions = models_parser.add_subparsers(dest="action", required=True)
    models_list = model_actions.add_parser("list", help="models, recipes, licences and whether weights are here")
    models_list.add_argument("--json", action="store_true", help="print JSON instead of a table")
    accept = model_actions.add_parser("accept", help="accept a model's weight licence (needed before download)")
    accept.add_argument("name")


def run(args) -> None:
    from ..models import registry, weights

    if args.action == "accept":
        spec = registry.get(args.name)
        if spec.weights is None:
            print(f"{spec.name} needs no weights: there is no licence to accept.")
            return
        if not spec.weights.needs_acknowledgement:
            print(
                f"{spec.name}'s weights are published under {spec.weights.licence}, which needs no acceptance: "
                f"nothing to accept, and nothing was recorded."
            )
            return
        weights.acknowledge(spec.name)
        print(f"Accepted for {spec.name}: {spec.weights.licence} ({spec.weights.url}).")
        return
    table = registry.summary()
    if args.json:
        print(as_json(table))
    else:
        print(table.to_string(index=False))
