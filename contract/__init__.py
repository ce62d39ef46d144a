"""Torch-free records both sides of the wire share: the sampling record and the model card, each
with its validation and its protobuf conversion beside it; and what every serving process does
once it is up (``heap``)."""
