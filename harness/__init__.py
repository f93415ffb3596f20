"""vtc-harness: benchmark and ablation harness for video-token compression in video LLMs."""
