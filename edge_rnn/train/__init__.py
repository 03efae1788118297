"""Training: the Keras LSTM MNIST recipe (lstm) on one process or several (distribute), the NumPy min-char-rnn
(char_rnn), and their data sources (data). Workstation side: imports TensorFlow inside functions."""
