"""provision: converge GPU hosts to ComfyUI + Nunchaku, then prove it with real generations."""

__version__ = "0.1.0"
