"""The generation loop across stages: ``generate`` (stage 0's scheduler: lanes, micro-batches,
admission, the items it sends), ``stage`` (what every stage does with an item), ``p2p`` (the items'
transport), ``sampling``, ``tensor_parallel`` (hooks that split a stage's layers over ranks),
``quantize`` (int8 weights) and ``schedule_check`` (the loop's schedule validated without processes)."""
