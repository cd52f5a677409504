"""The names people write for an embedding model, folded to the one the registry and the references use:
any case, with or without hyphens and spaces, or the name the model's paper gives (``CT-CLIP`` for
``CTClipVit``, ``SuPreM`` for ``SUPREME``). Below the references and the registry, so that both resolve a
name the same way (the registry re-exports :func:`canonical`)."""

from __future__ import annotations

#: Each registry model and the names its paper and the docs use (the registry's names are those of the
#: NLST-Sybil reference).
ALIASES = {
    "FMCIB": ("FM-CIB",),
    "CTFM": ("CT-FM",),
    "VISTA3D": ("VISTA-3D",),
    "SUPREME": ("SuPreM",),
    "ModelsGen": ("Models Genesis", "ModelsGenesis", "Genesis"),
    "Voco": ("VoCo", "VoCo-H"),
    "PASTA": (),
    "Merlin": (),
    "CTClipVit": ("CT-CLIP", "CTCLIP", "CT-CLIP ViT"),
    "TumorDescriptor": ("descriptor",),
}


def _folded(name) -> str:
    """A name as compared: any case, without spaces, hyphens or underscores (``CT-CLIP`` = ``ctclip``)."""
    return "".join(c for c in str(name).lower() if c.isalnum())


_BY_FOLDED = {_folded(alias): model for model, aliases in ALIASES.items() for alias in (model, *aliases)}


def canonical(name: str, among=None) -> str | None:
    """The model ``name`` means, in any case or by a documented alias (``CT-CLIP``, ``suprem``): the registry's
    name, or with ``among`` (a reference's models) the one of those it means; None when it means none."""
    folded = _folded(name)
    if among is None:
        return _BY_FOLDED.get(folded)
    among = list(among)
    for model in among:  # a reference's own spelling first (its models need not be the registry's)
        if _folded(model) == folded:
            return model
    meant = _BY_FOLDED.get(folded)
    return next((m for m in among if meant is not None and _BY_FOLDED.get(_folded(m)) == meant), None)
