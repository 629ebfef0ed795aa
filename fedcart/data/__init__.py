"""Basket data for data scientists: the bundled data sets and CSV loaders, the evaluation
protocol, the central baselines and the memory budget they are sized by."""
