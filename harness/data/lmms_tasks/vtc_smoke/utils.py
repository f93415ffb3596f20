"""Prompt and scoring of the embedded smoke task (lmms_eval task functions)."""

import re

from harness.data.generated import video_path

PROMPT_SUFFIX = "Answer with the option's letter from the given choices directly."


def doc_to_visual(doc):
    return [video_path(doc["video"])]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return "\n".join([doc["question"], *doc["options"], PROMPT_SUFFIX])


def extract_letter(prediction: str) -> str:
    """The first option letter A-D in the answer ('' if none), as VideoMME's scorer reads it."""
    match = re.search(r"[ABCD]", prediction.strip())
    return match.group(0) if match else ""


def process_results(doc, results):
    return {"accuracy": float(extract_letter(results[0]) == doc["answer"])}
