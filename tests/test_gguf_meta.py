"""The GGUF header reader's file-type names match the gguf package's (the daemon keeps its
own table so it never imports gguf, ~5 MB of RSS)."""

from __future__ import annotations

import gguf

from edge_agent.models.gguf_meta import FILE_TYPE_NAMES, quant_name


def test_file_type_names_match_the_gguf_package() -> None:
    theirs = {
        member.value: member.name.removeprefix("MOSTLY_").removeprefix("ALL_")
        for member in gguf.LlamaFileType
    }
    assert theirs == FILE_TYPE_NAMES


def test_unknown_and_missing_file_types_are_named() -> None:
    assert quant_name(7) == "Q8_0" and quant_name(25) == "IQ4_NL"
    assert quant_name(5) == "FTYPE_5"  # a retired value
    assert quant_name(None) == "UNKNOWN"
