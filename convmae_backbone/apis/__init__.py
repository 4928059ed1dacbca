"""What the command-line tools do (``tools/*.py`` are thin wrappers): options and runners (:mod:`.cli`),
official-checkpoint conversion (:mod:`.convert`), backbone export (:mod:`.export`), compile/export/ONNX
deployment (:mod:`.deploy`) and reconstruction figures (:mod:`.visualization`)."""
