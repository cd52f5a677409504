"""The module's planned install, asked of PyPI in each Slicer lane (``scripts/slicer_lanes.sh``: Slicer's Python
and packages): it changes no distribution imported at that moment, or it says which it would replace (and
the module then installs only with a restart). Needs PyPI, so it runs in the lanes only."""

from __future__ import annotations

import os
import sys

import numpy as np
import pandas as pd
import pytest
from SimilarPatientsLib.references import schema
from SimilarPatientsLib.references.store import ReferenceStore
from SimilarPatientsLib.ui import dependencies

pytestmark = pytest.mark.skipif(
    not os.environ.get("SIMILARPATIENTS_LANE"), reason="asks PyPI: runs in the Slicer lanes (scripts/slicer_lanes.sh)"
)


def test_the_planned_install_changes_no_imported_distribution_unless_it_says_so(tmp_path):
    """After a search (what the first Load follows), the module's whole plan, every package of it whether
    installed or not, dry-run with the module's constraints."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {"model": "M", "PatientID": [f"P{i}" for i in range(12)], "embedding": list(rng.standard_normal((12, 4)))}
    )
    ReferenceStore(tmp_path).write("r", schema.from_frame(frame), "plan test")
    assert len(ReferenceStore(tmp_path).open("r").search("M", patient="P1", k=3)) == 3
    imported = dependencies.imported_distributions()
    assert "pandas" in imported and "pyarrow" in imported

    packages = list({r.name: r for group in dependencies.companions(True) for r in group}.values())
    installer = dependencies.SlicerInstaller(python=sys.executable, testing=False)
    plan = installer.resolve(dependencies.InstallPlan(None, packages))
    requirements = [r.pip for r in packages]
    try:
        planned = installer.dry_run(requirements, dependencies.constraints_text(imported))
    except dependencies.SimilarPatientsError:  # the imported versions cannot all be kept: the plan must say so
        assert plan.replaces, "pip cannot keep the imported versions, and the plan does not say which it replaces"
        changed = installer.dry_run(requirements, dependencies.constraints_text())
        assert {name for name, _, _ in plan.replaces} == {n for n, v in changed.items() if imported.get(n, v) != v}
        print("restart needed:", plan.restart_question())
    else:
        changed = {name: (imported[name], new) for name, new in planned.items() if imported.get(name, new) != new}
        assert changed == {} and plan.replaces == []
        print("installs without touching what is imported:", planned or "nothing")
