"""Pure imaging: decoding, LUTs and windowing, letterbox geometry, Grad-CAM maps, overlays."""
