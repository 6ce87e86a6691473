"""Networks of your own: `train.model: nets/<file>.py:<Name>` trains one (docs/models.md, Your own network).

Each receives float images (B, 1, H, W), already normalised, and returns logits (B, classes); its
constructor gets `num_classes`, `in_channels` and `image_shape` (H, W) when it names them, plus
`train.model_args`. This folder is a dependency of the train and evaluate stages: editing a file here
reruns them.
"""
