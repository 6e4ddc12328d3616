"""What an architecture adapter provides: the per-family knowledge that a trace cannot give.

The op structure of a model comes from its `torch.export` graph (recognize.py). An
adapter adds what the graph does not say: its HF classes, where the decoder layers are
and the role of each module inside a layer (which linear is q, which norm comes before
the MLP), settings read from the config (rotary base, position offset, sliding window),
and the settings it refuses.
"""

from __future__ import annotations


class Adapter:
    """One per model family; subclasses set the class attributes."""

    family: str
    config_class: type
    model_class: type
    layers: str  # module path of the decoder layers' list, e.g. "transformer.h"
    # module path inside a layer -> op role; a tuple: a fused projection, split in this order
    roles: dict[str, str | tuple[str, ...]]
    outer_roles: dict[str, str] = {}  # module path outside the layers -> op role (e.g. OPT's project_in)
    head: str = "lm_head"  # module path of the unembedding
    norm_bias: bool = True  # its layer norms have a bias (RMSNorm has none)
    position_offset: int = 0  # learned positions: the table row of position 0
    config_keys: tuple[str, ...] = ()  # kwargs the HF config class reads but does not list (legacy names)
    # attention-module attributes that attention_extras reads per layer: alike layers may differ in them
    # (repeat.py then takes each layer's extras from the adapter)
    per_layer_attrs: tuple[str, ...] = ()
    layer_returns_tuple: bool = False  # a decoder layer returns (hidden_states, …) and the model takes [0]

    def config_refusals(self, config) -> list[tuple[str, str]]:
        """(HF config key, "got ...; allowed: ...") for each setting of `config` with no TinT construction;
        the config loader reports them under model.config.KEY."""
        return []

    def check(self, model) -> list[str]:
        """Problems with settings this adapter does not support, each naming its module path."""
        return []

    def max_positions(self, model) -> int:
        return model.config.max_position_embeddings

    def embed_scale(self, model) -> float | None:
        """The factor the token embedding is multiplied by, as the model computes it (None: none)."""
        return None

    def rope_theta(self, model) -> float:
        raise NotImplementedError(f"the {self.family} adapter knows no rotary embedding")

    def attention_extras(self, model, layer: int) -> dict:
        """Attention attributes of layer `layer` that come from the config (e.g. a sliding window)."""
        return {}
