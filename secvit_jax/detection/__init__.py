"""Object detection building blocks shared by the detection heads: anchors, box arithmetic and
coding, ground-truth assignment, padded non-maximum suppression. Static shapes throughout."""
