"""Engine glue: the scheduler, the model runner and the attention segment planner."""
