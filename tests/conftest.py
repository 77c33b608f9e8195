from hypothesis import HealthCheck, settings

# Bounded example counts keep CI fast; `HYPOTHESIS_PROFILE=thorough` for local digging.
settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile("ci")
