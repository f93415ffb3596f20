"""Prompt and scoring of the embedded synthetic task (lmms_eval task functions)."""

from harness.synthetic_data import prompt_of
from harness.tasks.vtc_smoke.utils import extract_letter


def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    # the same text the micro model was trained on (harness.synthetic_data.prompt_text)
    return prompt_of(doc["question"], doc["options"])


def process_results(doc, results):
    return {"accuracy": float(extract_letter(results[0]) == doc["answer"])}
