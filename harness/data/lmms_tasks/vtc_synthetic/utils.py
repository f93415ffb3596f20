"""Prompt and scoring of the embedded synthetic task (lmms_eval task functions)."""

from harness.data.generated import video_path
from harness.data.lmms_tasks.vtc_smoke.utils import extract_letter
from harness.data.synthetic import prompt_of


def doc_to_visual(doc):
    return [video_path(doc["video"])]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    # the same text the micro model was trained on (harness.data.synthetic.prompt_text)
    return prompt_of(doc["question"], doc["options"])


def process_results(doc, results):
    return {"accuracy": float(extract_letter(results[0]) == doc["answer"])}
