"""ModelScope's name constants that the GPT-3 model cards use (modelscope.utils.constant.Tasks,
modelscope.metainfo.Trainers / Metrics), with ModelScope's string values."""

from __future__ import annotations


class Tasks:
    text_generation = "text-generation"


class Trainers:
    gpt3_trainer = "nlp-gpt3-trainer"
    nlp_base_trainer = "nlp-base-trainer"


class Metrics:
    ppl = "ppl"
    text_gen_metric = "text-gen-metric"
