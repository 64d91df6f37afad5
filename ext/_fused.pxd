# The floating types every kernel is compiled for: updates (in_t) and results (out_t)
# are float32 or float64 independently.
ctypedef fused in_t:
    float
    double

ctypedef fused out_t:
    float
    double
