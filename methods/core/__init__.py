"""The shared machinery every compressor builds on: the stage interface and knob declarations
(base), the decoder driver (decoder), attention rows beside the model's kernel (attention), FLOPs
and retention (flops), density-peak clustering (clustering), similarities and frame segments
(similarity), and top-k selection (select). Nothing here is a method."""
