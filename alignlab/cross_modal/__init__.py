"""The cross-modal family (issue 6): aligning two sides of a pair. Speech frames and labels (`ctc`), questions
and code (`mining`), two languages' embedding spaces (`embeddings`), images and captions (`captioning`).
The frozen text encoder they share is `alignlab.text` (all-MiniLM-L6-v2, offline)."""
