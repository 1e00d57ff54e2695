"""The HTTP applications: the balancer (`lb`), its configuration (`config`), the echo test
backend (`echo`) and process launching (`launch`)."""
