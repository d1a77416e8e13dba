"""Concept data: photos, concept folders, importers, training records, the manifest, the VQ token cache.

Names are imported lazily so that ``import yochameleon.data`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Photo": "photos",
    "PhotoReport": "photos",
    "PhotoError": "photos",
    "load_photos": "photos",
    "load_rgb": "photos",
    "to_rgb": "photos",
    "file_sha256": "photos",
    "ConceptFolder": "concept_folder",
    "read_qa": "concept_folder",
    "import_yollava": "importers",
    "import_yochameleon_json": "importers",
    "Record": "records",
    "DataConfig": "config",
    "prepared_settings": "config",
    "SoftPositive": "records",
    "make_records": "records",
    "build_records": "records",
    "Manifest": "manifest",
    "MANIFEST": "manifest",
    "write_manifest": "manifest",
    "read_manifest": "manifest",
    "read_header": "manifest",
    "summary_table": "manifest",
    "TokenCache": "token_cache",
    "default_cache_dir": "token_cache",
    "Answerer": "qa",
    "PromptedAnswerer": "qa",
    "QAResult": "qa",
    "generate_text_qa": "qa",
    "facts_to_qa": "qa",
    "fact_question": "qa",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
