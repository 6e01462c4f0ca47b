"""Adapter kinds beyond plain LoRA (DoRA, IA3, LoHa, LoKr, sequence kinds, bottlenecks): the math both
engines and the converters share. Each module registers its kinds with edgeadapt.formats.delta_kinds."""
