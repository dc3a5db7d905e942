"""Stand-ins for fvcore.nn's FLOP counters, which the release imports but never calls in a model."""


def _absent(*args, **kwargs):
  raise NotImplementedError('fvcore is not installed: this is the benchmarks\' import stand-in')


FlopCountAnalysis = _absent
flop_count_table = _absent
