"""The text modality: CSV/JSONL records or .txt files -> token ids over a vocabulary fitted on train."""
