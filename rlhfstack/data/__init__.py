"""Data: typed examples, loaders with precise errors, adapters, chat templates, collators.

Typical use::

    from rlhfstack.data import load_preferences, tokenize_preference, collate_preference

    pairs, report = load_preferences("preference/hh-rlhf_harmless-base_1812.jsonl.gz",
                                     on_error="skip", tokenizer=tok,
                                     max_prompt_tokens=256, max_response_tokens=128)
    print(report.summary())
    items = tokenize_preference(pairs, tok, max_len=384)
    batch = collate_preference(items[:8], pad_id=tok.pad_token_id)
"""

from .adapters import (
    ADAPTERS,
    adapt,
    detect_adapter,
    get_adapter,
    parse_hh_transcript,
    require_field,
    split_hh_pair,
    validate_example,
)
from .collate import (
    IGNORE_INDEX,
    adds_bos,
    check_tokenizer,
    collate_preference,
    collate_prompts,
    collate_sft,
    count_long_prompts,
    encode_prompts,
    encode_responses,
    filter_by_length,
    pad_sequences,
    pairs_share_prompts,
    tokenize_preference,
    tokenize_sft,
)
from .loading import (
    default_data_root,
    iter_records,
    load_examples,
    load_preferences,
    load_prompts,
    load_records,
    load_sft,
    load_unpaired,
    map_records,
    resolve_data_path,
    to_hf_dataset,
)
from .schemas import (
    DataError,
    DataFileNotFoundError,
    LoadReport,
    PreferenceExample,
    PromptExample,
    SFTExample,
    UnpairedExample,
)
from .templates import ChatTemplate, get_template, join_prompt_response

__all__ = [
    "ADAPTERS",
    "IGNORE_INDEX",
    "ChatTemplate",
    "DataError",
    "DataFileNotFoundError",
    "LoadReport",
    "PreferenceExample",
    "PromptExample",
    "SFTExample",
    "UnpairedExample",
    "adapt",
    "adds_bos",
    "check_tokenizer",
    "collate_preference",
    "collate_prompts",
    "collate_sft",
    "count_long_prompts",
    "default_data_root",
    "detect_adapter",
    "encode_prompts",
    "encode_responses",
    "filter_by_length",
    "get_adapter",
    "get_template",
    "iter_records",
    "join_prompt_response",
    "load_examples",
    "load_preferences",
    "load_prompts",
    "load_records",
    "load_sft",
    "load_unpaired",
    "map_records",
    "pad_sequences",
    "pairs_share_prompts",
    "parse_hh_transcript",
    "require_field",
    "resolve_data_path",
    "split_hh_pair",
    "to_hf_dataset",
    "tokenize_preference",
    "tokenize_sft",
    "validate_example",
]
