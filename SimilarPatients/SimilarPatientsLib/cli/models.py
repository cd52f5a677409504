"""``similar-patients models list|accept|download|import``: the embedding models, their weights and licences;
weights fetched ahead of time, or imported from a file fetched elsewhere (TotalSegmentator's convention)."""

from __future__ import annotations

from ..errors import SimilarPatientsError
from .output import as_json
from .progress import Bars


def add(verbs) -> None:
    models_parser = verbs.add_parser("models", help="list the embedding models, accept licences, fetch weights")
    model_actions = models_parser.add_subparsers(dest="action", required=True)
    models_list = model_actions.add_parser("list", help="models, aliases, recipes, licences, weights present?")
    models_list.add_argument("--json", action="store_true", help="print JSON instead of a table")
    accept = model_actions.add_parser("accept", help="accept models' weight licences (needed before download)")
    accept.add_argument("name", nargs="+", metavar="MODEL", help="models, or 'all'")
    download = model_actions.add_parser("download", help="fetch weights now (for offline use later)")
    download.add_argument("name", nargs="+", metavar="MODEL", help="models, or 'all' (every model with weights)")
    download.add_argument("--accept-licence", action="store_true", help="accept the licences it asks for")
    download.add_argument(
        "--revision",
        metavar="REV",
        help="an unpinned hub model's commit, tag or branch: fetched, then recorded as the one later downloads ask for",
    )
    imported = model_actions.add_parser("import", help="use a weights file fetched elsewhere (checked, copied)")
    imported.add_argument("name", metavar="MODEL")
    imported.add_argument("file", metavar="FILE")


def _specs(names: list) -> list:
    from ..models import registry

    if [n.lower() for n in names] == ["all"]:
        return [spec for spec in registry.MODELS.values() if spec.weights is not None]
    if any(n.lower() == "all" for n in names):
        raise SimilarPatientsError("Name models, or 'all' alone, not both.")
    return [registry.get(name) for name in names]


def run(args, progress: Bars) -> None:
    from ..models import registry, weights

    if args.action == "accept":
        for spec in _specs(args.name):
            _accept(spec, weights)
        return
    if args.action == "download":
        specs = [spec for spec in _specs(args.name) if spec.weights is not None]
        if args.revision and len(args.name) != 1:
            raise SimilarPatientsError("--revision pins one model: name it alone.")
        states = [weights.status(spec.name, spec.weights) for spec in specs]
        weights.require_acceptance(states, args.accept_licence)  # one question, before any download
        for spec in specs:
            if args.revision:
                path = weights.pin_revision(spec.name, spec.weights, args.revision, args.accept_licence, progress)
            else:
                path = weights.resolve(spec.name, spec.weights, progress=progress)
            progress.close()
            print(f"{spec.name}: {path} ({weights.revision(spec.name, spec.weights)})")
        return
    if args.action == "import":
        spec = registry.get(args.name)
        if spec.weights is None:
            raise SimilarPatientsError(f"{spec.name} needs no weights: there is nothing to import.")
        print(f"{spec.name}: {weights.import_file(spec.name, spec.weights, args.file)}")
        return
    table = registry.summary()
    if args.json:
        print(as_json(table))
    else:
        print(table.to_string(index=False))


def _accept(spec, weights) -> None:
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
