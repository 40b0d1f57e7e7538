"""Dictionaries (SAEs or the identity): kinds, file formats, the cache, the corpus,
the activation harvest and the TopK trainer."""

from attribution.dictionaries.formats import DictionaryFileError, load_dictionary, save_dictionary
from attribution.dictionaries.kinds import SAE, Dictionary, Identity, random_sae
from attribution.dictionaries.sets import DictionarySet, LazyDictionarySet, load_dictionaries
from attribution.dictionaries.store import (
    build_dictionaries,
    evaluate_dictionaries,
    load_cached_dictionaries,
)
from attribution.dictionaries.training import TrainConfig

__all__ = [
    "SAE",
    "Dictionary",
    "DictionaryFileError",
    "DictionarySet",
    "Identity",
    "LazyDictionarySet",
    "TrainConfig",
    "build_dictionaries",
    "evaluate_dictionaries",
    "load_cached_dictionaries",
    "load_dictionaries",
    "load_dictionary",
    "random_sae",
    "save_dictionary",
]
