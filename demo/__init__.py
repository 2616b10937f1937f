"""The Visualizer demo (``python demo/demo.py``), laid out as Detectron2's."""
