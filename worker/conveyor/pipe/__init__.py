"""DeepSpeed-style pipeline parallelism: ``from conveyor.pipe import PipelineModule, LayerSpec, TiedLayerSpec``."""

from conveyor.pipe.module import LayerSpec, PipelineModule, TiedLayerSpec

__all__ = ["LayerSpec", "PipelineModule", "TiedLayerSpec"]
