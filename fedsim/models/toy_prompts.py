"""The toy backbone's prompt templates and image token: plain strings, importable without
transformers (a run's driver records prompts in answer files; :mod:`fedsim.models.toy`, which
builds the toy, imports transformers' model classes)."""

IMAGE_TOKEN = "<image>"
CAPTION_PROMPT = "Caption :"
QA_PROMPT = "Question : {question} Answer :"
