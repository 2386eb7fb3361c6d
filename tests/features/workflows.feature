Feature: The README's workflows, run as a user runs them
  Each step calls the `visionflow` command in a subprocess, with settings that take seconds.

  Scenario: Train and register a model on my images
    Given a folder of my images in 3 classes
    When I run the pipeline on it
    Then a model that classifies my test images with at least 90% accuracy is the champion
    And its exported files compute what PyTorch computes
    And the quantize report says which variant is faster on this host
    And the evaluation shows a confusion matrix over my classes

  Scenario: A second run does not replace a better champion
    Given a champion trained on my images
    When I run the pipeline again with a model that learns nothing and no quality gate
    Then the new model is registered as version 2
    And the champion is still version 1, because version 2 does not beat it

  Scenario: A bad image folder fails with a clear message
    Given a folder of my images where 2 of 23 files are not images
    When I prepare it
    Then it fails naming the unusable files and the allowed share
    And nothing is written to the artifact store

  Scenario: A killed training resumes
    Given a prepared dataset and an uninterrupted reference training
    When my training is killed mid-epoch just after a checkpoint
    And I run the same training again
    Then it resumes from that checkpoint and ends at the end of the schedule
    And it redoes at most one checkpoint interval, with the same losses
    And it ends with the weights and metrics of the uninterrupted run
