"""NLST-Sybil searches printed as JSON, to compare two environments' answers (scripts/pandas_versions.sh):
the reference imported from the shared data into a temporary home, then searches by patient under two
models, with and without a text filter, every column of the hit tables (text, numbers, missing values) but
series_size_MB: the size comes from IDC's index (idc-index-data), whose releases round it differently, and
Python 3.9 cannot install the release the full lane has (>= 22.1.1 need Python 3.10).

    python scripts/neighbours_snapshot.py ../shared/data/nlst-sybil-embeddings
"""

from __future__ import annotations

import json
import math
import sys
import tempfile

from SimilarPatientsLib import ReferenceStore


def plain(value):
    """A cell as JSON the same on pandas 2 and 3: missing as None, floats to 6 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value


def main(data: str) -> None:
    with tempfile.TemporaryDirectory() as home:
        reference = ReferenceStore(home).import_reference("nlst-sybil", data)
        lesions = reference.lesions("CTFM")
        patients = [str(p) for p in lesions["PatientID"].iloc[[0, len(lesions) // 2]]]  # text read from Parquet
        answers = {}
        for patient in patients:
            for model in ("CTFM", "SUPREME"):
                for where in ([], ["histology~adeno", "sex=F"]):
                    hits = reference.search(model, patient=patient, k=10, where=where, exclude=[patient])
                    records = hits.to_dict("records")
                    answers[f"{patient} {model} {where}"] = [
                        {c: plain(v) for c, v in r.items() if c != "series_size_MB"} for r in records
                    ]
        print(json.dumps(answers, indent=1, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1])
