"""Many runs and what is made of them: results store, runner, sweep, bench, reports, advice, demo."""
