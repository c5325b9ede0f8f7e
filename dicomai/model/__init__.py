"""The fracture model: package manifest, onnxruntime classifier, grading."""
