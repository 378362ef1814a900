"""Scale-out pieces: trace collection across Ray workers (`tracing`, imports Ray) and routing-aware request
placement across engine replicas (`placement`, pure Python). Nothing here imports Ray at package import."""
