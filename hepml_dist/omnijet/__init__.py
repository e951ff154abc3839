"""OmniJet-alpha tools around the models: constituent preprocessing, tokenizing datasets, generating jets."""
